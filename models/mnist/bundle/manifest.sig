{
  "algorithm": "ed25519",
  "key_id": "7b93ea4393321064",
  "signature": "/2qqVP/I9RLrV0LaY4Q8XGUn2/tMd/J9SlEsQy1HxY783vxuTJQ2NfbVz26Jv3PfVBlwPYYe22ol8lu9a/BLAw=="
}
