"""Preprocessing of a session: registration to the T2w, resampling, N4, skull strip, tissues."""
