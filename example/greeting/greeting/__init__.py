def message(host, commit):
    return f"Welcome to {host}, deployed by troops at {commit[:12] if commit else 'a working copy'}."
