"""Load testing gcmd with locust: a TCP client and the locust user that drives it."""
