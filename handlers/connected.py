"""Log that a bridge connected, with the phone number it connected as."""

import logging

log = logging.getLogger("wabhook.handlers")


def handle(event):
    log.info("bridge %s connected, phone=%s", event.bridge or "(default)", event.phone)
