"""What an RFC 9421 request signature covers in this project's HTTP API: the client (`sle_events.client`) signs
these components, the server (`sle_events.api.auth`) requires them. A request with a body also covers its
content type and its RFC 9530 digest."""

READ_COMPONENTS = ("@method", "@path", "@query")
WRITE_COMPONENTS = (*READ_COMPONENTS, "content-type", "content-digest")
