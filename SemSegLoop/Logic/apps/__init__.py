"""Programs on top of the project API: the `semsegloop` command line and the built-in demo
(later the web app)."""
