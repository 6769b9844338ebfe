{
  "algorithm": "ed25519",
  "key_id": "fb61c05f78792c69",
  "signature": "gvfPsO9sLUX2fgKrOWJ0Khq1KGjqyr+sSBSAvqjk1Kn1d0ZCTA6CsEiA6RH7Kv6Akf3je4MR15f9iVZHwHj4BA=="
}
