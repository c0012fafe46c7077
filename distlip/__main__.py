from distlip.cli import entry

entry()
