"""The HTTP API (`sle serve`): signed requests, client-signed events, problem+json. See docs/api.md."""

from sle_events.api.app import create_app, mount_sub_app

__all__ = ["create_app", "mount_sub_app"]
