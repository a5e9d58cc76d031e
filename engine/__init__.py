r"""Assembly above common/, data/, model/ and text/: the model + plug-in factory, episode loops, evaluation protocols
and figures."""
