"""Device-side clients of AWS IoT services: Jobs (model updates) and the Device Shadow."""
