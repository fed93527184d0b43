"""The Lightning layer of the command line: ``PretrainingCLI`` (fit/validate/test), where a run lives
(``run_folder``), what a fit reports (``summary``: ``summary.json``) and measuring a cost table (``calibration``).

``studies``, ``benchmarks`` and the command modules in ``cli`` build on it; it imports none of them.
"""
