"""Typed keys for what the app shares between handlers."""

import collections

import aiohttp
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.deliveries import FiledDelivery, Incoming
from service.db.group_commit import GroupCommit
from service.db.subscriptions import NewSubscription, Subscribed
from service.metrics import Metrics
from service.settings import Settings
from service.webhooks.signatures import SignatureVerifier

SETTINGS = web.AppKey("settings", Settings)
ENGINE = web.AppKey("engine", AsyncEngine)
# Reads that may lag a little (lists, ops views): the replica when one is configured.
READ_ENGINE = web.AppKey("read_engine", AsyncEngine)
METRICS = web.AppKey("metrics", Metrics)
VERIFIER = web.AppKey("verifier", SignatureVerifier)
# Group commit of webhook deliveries, and of single subscribes.
DELIVERY_COMMITS: web.AppKey[GroupCommit[Incoming, FiledDelivery]] = web.AppKey("deliveries")
SUBSCRIBE_COMMITS: web.AppKey[GroupCommit[NewSubscription, Subscribed]] = web.AppKey("subscribes")
# Where `POST /v1/endpoints/{id}/test` sends its ping from, and each client's pings in flight.
NOTIFY_HTTP = web.AppKey("notify_http", aiohttp.ClientSession)
PINGS_IN_FLIGHT = web.AppKey("pings_in_flight", collections.Counter)
