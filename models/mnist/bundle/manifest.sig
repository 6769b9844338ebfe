{
  "algorithm": "ed25519",
  "key_id": "b4524250a20daa73",
  "signature": "8E/GOtgtLabDrZpaI+UrpuX5FsJtj3JS3QpoBmF6XLpNK0jpI0Jpe5VRrFm3ZmzwaA+yNuc6/DuxW9xEnCMHAw=="
}
