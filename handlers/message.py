"""Print each message someone else sent, as `name: body`.

Runs for every `message` event. `event` is a wabhook.MessageEvent: its fields
are the sender's documented ones (message_id, chat_id, name, body, from_me,
timestamp, ...), plus `bridge`, `id`, `received_at` and `raw`.
"""

from wabhook import MessageEvent


def handle(event: MessageEvent) -> None:
    if not event.from_me:
        print("%s: %s" % (event.name, event.body), flush=True)
        # reply, store, trigger a workflow... An exception here is retried.
