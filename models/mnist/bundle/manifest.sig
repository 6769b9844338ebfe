{
  "algorithm": "ed25519",
  "key_id": "7b93ea4393321064",
  "signature": "PtmuTfOL2oaK58cMpwLYdygWRdgAV9VPMc877FfvqCVpShHf4ULVYC74I2fBeneDs6bI6SxOd6eOsC0yhnHuBw=="
}
