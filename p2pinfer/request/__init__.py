"""The request path: the client (offer, election, streaming, failover) and the peer side (bids, execution)."""
