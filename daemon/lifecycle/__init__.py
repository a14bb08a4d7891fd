"""Process lifecycle: sd_notify, the systemd watchdog, signal handling."""
