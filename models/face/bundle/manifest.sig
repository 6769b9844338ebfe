{
  "algorithm": "ed25519",
  "key_id": "b4524250a20daa73",
  "signature": "CnlvP/fjZPIGWHTqxmIBK8K0sQjx7Ht/LYsh2FhvpOcFEf0ZSZw5uNU1bSXDpsNw1b0Y/vmjZYfDPj0450S7Bg=="
}
