{
  "algorithm": "ed25519",
  "key_id": "b4524250a20daa73",
  "signature": "9Dd5gWkn2u8hqDrnDsV7DOAvmKXDXazocB7GxElMnM6fhF+SKhp8TpQYQlvqxfG7aYdLKmi4LX0M0vXHXu+mAA=="
}
