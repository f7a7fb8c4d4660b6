"""The process around the data path: task ownership (``tasks``), logging and
1010 records (``logs``), systemd notification (``sdnotify``), the sysvinit
pid-file lock (``pidlock``), the loopback HTTP server (``httpd``) and the
SIGUSR1 debug endpoint (``debug``).
"""
