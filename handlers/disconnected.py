"""Warn when a bridge loses its WhatsApp session (it needs attention)."""

import logging

log = logging.getLogger("wabhook.handlers")


def handle(event):
    log.warning("bridge %s disconnected", event.bridge or "(default)")
