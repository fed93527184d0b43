"""The throughput benchmark (``throughput``: contenders, measurement, report) and the layer-cost fit (``layer_cost``)."""
