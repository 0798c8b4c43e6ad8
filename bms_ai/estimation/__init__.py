"""SOC, SOH and RUL estimation: classical filters, the NN+CC fusion filter and PackEstimator."""
