"""Account service: server accounts, till sign-in/out with per-till broker users, sync modes."""
