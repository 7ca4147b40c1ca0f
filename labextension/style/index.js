import './base.css';
import './launcher.css';
import './sidebar.css';
