"""Control-plane edge: who we are (Ed25519 identity, swarm key) and who is around (mDNS, peer table)."""
