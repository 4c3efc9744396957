"""Speed and memory goals, measured against a baseline in the same run (`make bench`)."""
