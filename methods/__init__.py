"""Knowledge-editing methods, installed as `kedit.methods`. Each module registers one method."""
