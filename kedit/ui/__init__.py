"""The history for people to look at: `kedit ui` (a local web view), `kedit report` (the same
as one HTML file) and `kedit log --plot`. Reads the repository, never writes it."""
