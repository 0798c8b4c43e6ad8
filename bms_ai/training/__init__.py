"""Training and tuning of the shipped models (`bms-ai train TASK`); imports torch/PyBaMM only when a task runs."""
