"""Lightning callbacks and the RST clock: work ledger, cost tables, budget, plan/calibrate, layer stacking and dropping."""
