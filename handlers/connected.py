"""Log that a bridge connected, with the phone number it connected as."""

import logging

log = logging.getLogger("wabhook.handlers")


def handle(event):
    # %r: the phone number is the sender's text, shown quoted and escaped, never raw.
    log.info("bridge %s connected, phone=%r", event.bridge or "(default)", event.phone)
