{
  "algorithm": "ed25519",
  "key_id": "b4524250a20daa73",
  "signature": "vBM8+2hm0o0HQZRsbAj+qEx58az2cnUj1szJbL2OhbMgCsnK2gIRR/9qkqOeB7dWR5szPh6jmNn65l+wEQQzBA=="
}
