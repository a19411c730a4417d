"""Hold one contract per artifact: an explicit Arrow schema plus a strict Pandera row schema."""
