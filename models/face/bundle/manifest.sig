{
  "algorithm": "ed25519",
  "key_id": "fb61c05f78792c69",
  "signature": "djft8KJzLpJUKqdNa7jR8nzz0RHKEPVYPqnwicPFvxkzGakDHhcxDN65YuB0ki4e3tuJ4NT27XE/VA1uy8uaAQ=="
}
