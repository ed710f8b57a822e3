"""Pluggable drivers: `network` (how the child gets a network) and `port` (how
published ports reach it). Each kind has a base class and a registry."""
