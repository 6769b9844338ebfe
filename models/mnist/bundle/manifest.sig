{
  "algorithm": "ed25519",
  "key_id": "fb61c05f78792c69",
  "signature": "FGHMBfUNNDPFNX7dmc4oZLcNJD4j1BrUVYWMHKFFBYhQ7+lQvd0Kdt4xo+dx6Q2ICQvtAIA/RkqvcKM/VpmHDQ=="
}
