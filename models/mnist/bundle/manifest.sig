{
  "algorithm": "ed25519",
  "key_id": "b4524250a20daa73",
  "signature": "7+JgKrmJ0ggSt7NYwNW68u4s9l71sOlyYziZS0XaTYXHmRkoSbVPvbP1iABJC6mwY4t7uk7MUlWPzwfl4Jx5Ag=="
}
