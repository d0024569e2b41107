"""Sealed networking: per-VM namespace + TAP + nftables, DNS, relay and TLS proxy."""
