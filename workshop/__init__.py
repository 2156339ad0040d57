"""workshop/: a 3-hour, self-checking teaching session on ReDiff: six exercises and check.py."""
