"""Whisper speech-to-text, text side: tokenizer, decoding algorithms, long-form transcription."""
