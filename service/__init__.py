"""Shipment tracking service: subscriptions, ShipEngine dispatch, webhooks and history."""
