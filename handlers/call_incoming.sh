#!/bin/sh
# An executable handler: any language works. The event JSON arrives on stdin;
# WABHOOK_EVENT, WABHOOK_ID and WABHOOK_BRIDGE are in the environment. Exit 0
# means handled; anything else is retried. What it prints goes to wabhook's log.
payload=$(cat)
caller=$(printf '%s' "$payload" | sed -n 's/.*"contact_id" *: *"\([^"]*\)".*/\1/p')
echo "incoming call from ${caller:-unknown} (event $WABHOOK_ID)"
