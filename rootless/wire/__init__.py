"""The handshake's wire: frames and the messages they carry."""
