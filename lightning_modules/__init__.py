"""LightningModules (BERT masked LM, T5 span corruption), their shared training logic, schedules and optimizers."""
