"""gcmd's OWN log (what it writes about its clients): set-up, formats, output.

Not to be confused with the logs gcmd serves: gcmd.logs."""
