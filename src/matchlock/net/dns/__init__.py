"""The guest-facing DNS resolver (`GuestResolver`) and its sans-I/O codec."""

from matchlock.net.dns._codec import DnsFormatError, Message, parse_message
from matchlock.net.dns.resolver import GuestResolver

__all__ = ["DnsFormatError", "GuestResolver", "Message", "parse_message"]
