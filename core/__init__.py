"""The Lightning-free core: errors, batch keys, the work ledger, cost tables, budget arithmetic, plan, calibration.

Everything else imports from here and nothing here imports Lightning or the rest of the project,
so the RST accounting can be read, tested and reused on its own (docs/design.md, "Layers").
"""
