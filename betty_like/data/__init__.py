"""Offline task data (Bach chorales from music21, generated Braille tactile events)."""
