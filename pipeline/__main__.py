from rs_pseudolabel.pipeline.cli import entry

entry()
