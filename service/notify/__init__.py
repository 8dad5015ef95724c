"""Push notifications: each change, signed (Standard Webhooks), to the endpoints that want it."""
