"""Feedback on served answers: the recent requests a rating can name, and the local store."""
