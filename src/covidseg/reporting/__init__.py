"""Pictures and HTML pages for people to look at."""
