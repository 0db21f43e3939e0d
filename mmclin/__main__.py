from mmclin.cli import main

main()
